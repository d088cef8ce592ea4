"""Tokenizers: UTF-8 bytes by default, a byte-level BPE trained locally, or any local HF tokenizer.

All three share one small interface (:class:`Tokenizer`): ``encode``, ``decode``, ``vocab_size``,
``eos_id``, ``identity``, ``encode_documents`` and ``save``; :func:`load_tokenizer` restores whichever
kind was saved from the ``miras_tokenizer.json`` written next to the tokenizer's own files.

Why these three:

- **Bytes** (256 ids) need no training and no files, so every machine can train on any text at once;
  the cost is ~4x longer sequences than BPE for English, which long-context memory models can afford.
- **BPE** is byte-level (GPT-2 style: every string encodes, ``decode(encode(s)) == s``), trained
  with the Rust ``tokenizers`` library on the corpus's *train* split and saved with the run as its
  ``tokenizer.json``. Training has no randomness: the same texts and vocabulary size give the
  same merges (checked across processes), so there is no seed.
- **HF** wraps a ``transformers`` tokenizer on local disk: a folder, or a name in the local HF cache
  (``transformers`` is optional and imported only when one is asked for; nothing is downloaded).

Documents are joined for language modelling by ``encode_documents``: each document's ids followed
by the end-of-document token when the tokenizer has one (BPE: ``<|endoftext|>``, HF: its
``eos_token``), and otherwise by the encoding of a blank line ``"\\n\\n"``: the 256 byte ids have no
spare id for a marker, and a blank line is how plain text already separates its parts.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..files import atomic_write_bytes

if TYPE_CHECKING:
    from .text import Corpus

METADATA = "miras_tokenizer.json"   # written by every ``save``; names the kind to restore
END_OF_TEXT = "<|endoftext|>"       # the BPE's end-of-document token (id 0: special tokens come first)
DOCUMENT_SEPARATOR = "\n\n"         # joins documents for tokenizers without an end-of-document token
ALLOWED = ("expected 'byte', 'bpe:<vocab_size>', 'hf:<name>' (a tokenizer in the local HF cache) or a folder "
           "saved by miras (Tokenizer.save) or by transformers (save_pretrained)")


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> ids. ``identity`` names the exact vocabulary (it keys the token cache)."""

    kind: str               # the key ``load_tokenizer`` restores it by
    vocab_size: int
    eos_id: int | None      # end-of-document id, None when the tokenizer has none

    @property
    def identity(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """The ids of every text, each followed by the end-of-document marker, as one int64 array."""
        ...

    def save(self, directory: str | Path) -> None: ...


def _write_metadata(directory: str | Path, kind: str, vocab_size: int) -> None:
    """Written last by every ``save`` (and atomically, like the tokenizer's own files: a resumed run saves
    again over the files its checkpoint depends on), so a folder with it holds a whole tokenizer."""
    text = json.dumps({"kind": kind, "vocab_size": vocab_size}) + "\n"
    atomic_write_bytes(Path(directory) / METADATA, text.encode("utf-8"))


def _folder(directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _join(id_lists: Sequence[Sequence[int]], separator: Sequence[int]) -> np.ndarray:
    """Concatenate ``ids + separator`` for every document."""
    parts = []
    for ids in id_lists:
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(np.asarray(separator, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class ByteTokenizer:
    """UTF-8 bytes: id = byte value. No end-of-document token (documents are joined by a blank line)."""

    kind = "byte"
    vocab_size = 256
    eos_id = None

    @property
    def identity(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # a model may emit a byte sequence that is not valid UTF-8: show it, don't fail
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        # one join and one frombuffer: ~10 MB/s in a Python loop becomes ~1 GB/s
        joined = "".join(text + DOCUMENT_SEPARATOR for text in texts).encode("utf-8")
        return np.frombuffer(joined, dtype=np.uint8).astype(np.int64)

    def save(self, directory: str | Path) -> None:
        _write_metadata(_folder(directory), self.kind, self.vocab_size)

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        return cls()


class BPETokenizer:
    """A byte-level BPE (``tokenizers`` library) with ``<|endoftext|>`` as id 0."""

    kind = "bpe"

    def __init__(self, tokenizer: _RustTokenizer):
        self.tokenizer = tokenizer
        # a literal "<|endoftext|>" in a document is text, not the end marker (not saved: set on every load)
        self.tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(END_OF_TEXT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges on ``texts`` until ``vocab_size`` ids (fewer if the texts run out of pairs).

        Deterministic: the same texts and size give the same tokenizer.
        """
        minimum = 256 + 1  # every byte plus <|endoftext|>
        if vocab_size < minimum:
            raise ValueError(f"BPE vocab_size={vocab_size}: must be at least {minimum} (256 bytes + {END_OF_TEXT})")
        tokenizer = _RustTokenizer(models.BPE())
        # GPT-2 style: map bytes to printable characters first, so that every string round-trips
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @property
    def identity(self) -> str:
        return "bpe-" + hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return _join([encoding.ids for encoding in encodings], [self.eos_id])

    def save(self, directory: str | Path) -> None:
        directory = _folder(directory)
        text = self.tokenizer.to_str(pretty=True)  # what ``Tokenizer.save`` writes, through a temp file
        atomic_write_bytes(directory / "tokenizer.json", text.encode("utf-8"))
        _write_metadata(directory, self.kind, self.vocab_size)

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        return cls(_RustTokenizer.from_file(str(Path(directory) / "tokenizer.json")))

    def to_json(self) -> str:
        """The whole tokenizer as the JSON text that ``from_json`` reads (what ``save`` writes, unindented)."""
        return self.tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        return cls(_RustTokenizer.from_str(text))


# A slow (Python) HF tokenizer's settings that do not change its ids: where it was loaded from, and the length limit
# that __init__ raises and save() writes (hashed, they made a run's saved tokenizer differ from the one it started with)
NOT_TOKENISATION = frozenset({"model_max_length", "is_local", "local_files_only", "cache_dir", "_commit_hash"})
# The paths of a slow tokenizer's vocabulary files, which its init settings hold: their contents are hashed instead
VOCAB_FILE_KEYS = frozenset({"vocab_file", "merges_file", "spm_file", "sp_model_file", "tokenizer_file"})


class HFTokenizer:
    """A ``transformers`` tokenizer from a local folder or the local HF cache (never downloaded)."""

    kind = "hf"

    def __init__(self, path: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError(
                f"tokenizer {str(path)!r} is a Hugging Face tokenizer, which needs `transformers`: "
                "pip install transformers"
            ) from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):  # transformers' several-line messages: say it in one
            where = (f"folder {str(path)!r} holds no tokenizer that miras or transformers can load"
                     if Path(path).is_dir() else f"{str(path)!r} is neither a folder nor a Hugging Face tokenizer "
                     "in the local HF cache (nothing is downloaded)")
            raise ValueError(f"tokenizer {where}; {ALLOWED}") from None
        # we tokenise whole documents, never feed them to a model at once: silence the length warning
        self.tokenizer.model_max_length = 2**62
        self.vocab_size = len(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id

    @property
    def identity(self) -> str:
        """What decides the token ids: the vocabulary and, for a fast tokenizer, the whole pipeline
        (normaliser, pre-tokenizer, merges, post-processor); for a slow one, its settings and the files
        its vocabulary is saved as (merges, a SentencePiece model). Two tokenizers sharing a vocabulary but
        splitting text differently never share a token cache."""
        vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()), ensure_ascii=False)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            pipeline = backend.to_str()
        else:
            settings = {k: v for k, v in self.tokenizer.init_kwargs.items()
                        if k not in NOT_TOKENISATION and "name_or_path" not in k and k not in VOCAB_FILE_KEYS}
            pipeline = json.dumps(settings, sort_keys=True, default=str) + self._vocabulary_files_digest()
        text = f"{type(self.tokenizer).__name__}:{vocab}:{pipeline}"
        return "hf-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def _vocabulary_files_digest(self) -> str:
        """sha256 of the files a slow tokenizer saves its vocabulary as (``save_vocabulary``), in name order."""
        digest = hashlib.sha256()
        with tempfile.TemporaryDirectory(prefix="miras-tokenizer-") as temp:
            for file in sorted(Path(f) for f in self.tokenizer.save_vocabulary(temp)):
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
        return digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a special token's text written in a document ("<|endoftext|>" in source
        # code about tokenizers) is read as text, as the BPE reads it; only _join writes the end marker.
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        separator = [self.eos_id] if self.eos_id is not None else self.encode(DOCUMENT_SEPARATOR)
        ids = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return _join(ids, separator)

    def save(self, directory: str | Path) -> None:
        """``save_pretrained`` into a temp folder beside, then each file moved in whole (``atomic_write``)."""
        directory = _folder(directory)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer.") as temp:
            self.tokenizer.save_pretrained(temp)
            for file in sorted(Path(temp).rglob("*")):
                if file.is_file():
                    target = directory / file.relative_to(temp)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(target, file.read_bytes())
        _write_metadata(directory, self.kind, self.vocab_size)

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        return cls(directory)


KINDS = {"byte": ByteTokenizer, "bpe": BPETokenizer, "hf": HFTokenizer}


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Restore the tokenizer that ``save(directory)`` wrote, whatever its kind."""
    path = Path(directory) / METADATA
    if not path.is_file():
        raise ValueError(f"tokenizer folder {str(directory)!r}: no {METADATA} (was it written by Tokenizer.save?)")
    kind = json.loads(path.read_text())["kind"]
    if kind not in KINDS:
        raise ValueError(f"tokenizer folder {str(directory)!r}: unknown kind {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind].load(directory)


def bpe_size(spec: str) -> int | None:
    """The vocabulary size a ``"bpe:<N>"`` spec asks for (None: another spec, or no integer N)."""
    size = spec.removeprefix("bpe:")
    return int(size) if spec.startswith("bpe:") and size.isdigit() else None


def get_tokenizer(spec: str, corpus: Corpus | None = None) -> Tokenizer:
    """``"byte"`` | ``"bpe:<vocab_size>"`` (trained on ``corpus``'s train split) | ``"hf:<name>"`` (a Hugging
    Face tokenizer already in the local HF cache) | a local folder: one written by ``Tokenizer.save``,
    or else a Hugging Face tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if not spec.strip():  # (Path("") is the working directory: an unset shell variable would load what lies there)
        raise ValueError(f"tokenizer {spec!r} is empty; {ALLOWED}")
    if spec.startswith("hf:"):
        return HFTokenizer(spec.removeprefix("hf:"))
    if spec.startswith("bpe:"):
        size = bpe_size(spec)
        if size is None:
            raise ValueError(f"tokenizer {spec!r}: the vocabulary size must be an integer; {ALLOWED}")
        if corpus is None:
            raise ValueError(f"tokenizer {spec!r}: a BPE is trained on a corpus; pass the corpus to train it on")
        return BPETokenizer.train((document.text for document in corpus.split("train")), size)  # (read as it goes)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_tokenizer(path) if (path / METADATA).is_file() else HFTokenizer(path)
    raise ValueError(f"tokenizer {spec!r}: not a known kind and no such folder; {ALLOWED}")
