"""HF tokenizers for miras models: the byte tokenizer, a locally trained BPE, or any HF tokenizer.

- **Bytes** become a ``PreTrainedTokenizerFast`` over a ``tokenizers`` BPE model with no merges
  whose 256 tokens are the GPT-2 byte-level characters, token id = byte value, so it encodes exactly
  as :class:`miras.data.tokenizers.ByteTokenizer` (``ids == list(text.encode("utf-8"))``) and is
  saved as a standard ``tokenizer.json`` (no custom code of its own; ``AutoTokenizer`` on an exported
  folder still reads its ``config.json``, whose ``auto_map`` names the model's code: pass
  ``trust_remote_code=True``, or transformers asks whether to run it, waiting 15 s in a terminal). The
  native one has no end-of-text token, but HF generation and lm-eval need one (as a stop sequence,
  and as the context of an empty prompt): byte 0 (NUL, which text does not contain) is named eos.
  ``split_special_tokens`` keeps the text form of that token, "Ā", encoding as its UTF-8 bytes.
- **BPE** (a ``tokenizers.Tokenizer``, e.g. a run's ``tokenizer.json``) is wrapped as is, with
  ``<|endoftext|>`` as its end-of-text token when it has one; special tokens written in a text encode as
  the backend does (a miras BPE: as text).
- An HF tokenizer is used as it is.
Decoding never cleans up spaces: ``decode(encode(text)) == text``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def byte_characters() -> list[str]:
    """The printable character standing for each byte 0..255 in byte-level BPE (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the other bytes for 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    characters, extra = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + extra))
            extra += 1
    return characters


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """UTF-8 bytes as an HF tokenizer: id = byte value, 256 tokens; eos is byte 0 (NUL)."""
    vocab = {character: byte for byte, character in enumerate(byte_characters())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no splitting into words, every byte is its own token whatever the text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   eos_token=byte_characters()[0], split_special_tokens=True)


def bpe_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A trained ``tokenizers`` BPE as an HF tokenizer; ``<|endoftext|>`` is its eos when present. Special tokens
    written in a text encode as the backend does (``split_special_tokens``): a miras BPE reads them as text, as in
    training, where only the document boundary miras adds is the eos id."""
    special = {}
    if backend.token_to_id(END_OF_TEXT) is not None:
        special = {"eos_token": END_OF_TEXT, "bos_token": END_OF_TEXT}
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   split_special_tokens=backend.encode_special_tokens, **special)


def hf_tokenizer(tokenizer) -> PreTrainedTokenizerBase:
    """The HF tokenizer for a miras tokenizer (``miras.data.tokenizers``: kind "byte", "bpe" or "hf"),
    a ``tokenizers.Tokenizer``, or an HF tokenizer (returned as is)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        return bpe_tokenizer(tokenizer)
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        return byte_tokenizer()
    if kind == "bpe":
        return bpe_tokenizer(tokenizer.tokenizer)
    if kind == "hf":
        return tokenizer.tokenizer
    raise TypeError(f"cannot make an HF tokenizer from {type(tokenizer).__name__} (kind {kind!r}); expected a miras "
                    "tokenizer of kind 'byte', 'bpe' or 'hf', a tokenizers.Tokenizer or an HF tokenizer")
