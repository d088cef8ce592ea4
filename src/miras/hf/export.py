"""Export a native model, or a whole training run, as a HuggingFace folder.

``export(model, tokenizer, hf_dir)`` writes ``model.safetensors`` (a tied head is stored once),
``config.json`` (the native config inside, ``auto_map`` naming ``modeling_miras.py``),
``generation_config.json``, ``modeling_miras.py`` and the tokenizer's files, so that

    AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)   # (the config's auto_map is code)

work in any process where ``miras-lm[hf]`` is installed. ``export_run(run_dir, hf_dir)`` does the
same for a training run, read with ``miras.train.load_run``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..models import LanguageModel
from .modeling import MirasForCausalLM
from .tokenization import hf_tokenizer

TRAIN_CONFIG = "miras_train_config.json"  # the run's training config, kept for provenance
# What a tokenizer's save_pretrained may write (transformers 4.x and 5.x): removed from a folder exported again
# without a tokenizer, so that AutoTokenizer does not load the previous export's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def export(model: LanguageModel, tokenizer, hf_dir: str | os.PathLike, *, train_config=None) -> MirasForCausalLM:
    """Save ``model`` with ``tokenizer`` (a miras tokenizer, a ``tokenizers.Tokenizer``, an HF tokenizer,
    or None for a model of a generated task's tokens) as an HF folder; returns the wrapper (sharing
    ``model``'s weights)."""
    hf_dir = Path(hf_dir)
    check_export_folder(hf_dir)
    special = {}
    if tokenizer is not None:
        tokenizer = hf_tokenizer(tokenizer)
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model only {model.config.vocab_size}")
        special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    wrapped = MirasForCausalLM.from_native(model, **special)
    for name, value in special.items():
        setattr(wrapped.generation_config, name, value)
    if tokenizer is not None and len(tokenizer) < model.config.vocab_size:
        # a model wider than its tokenizer (model.vocab_size above the data's): generate never draws the ids
        # the tokenizer cannot decode, as `miras generate` does not
        wrapped.generation_config.suppress_tokens = list(range(len(tokenizer), model.config.vocab_size))
    wrapped.save_pretrained(hf_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(hf_dir)
        _portable_tokenizer_class(hf_dir)
    if train_config is not None:
        (hf_dir / TRAIN_CONFIG).write_text(json.dumps(_plain(train_config), indent=2, default=str) + "\n")
    # an export into a folder that held another: nothing of the previous one's may outlive it
    stale = ((TOKENIZER_FILES if tokenizer is None else ()) + ((TRAIN_CONFIG,) if train_config is None else ()))
    for name in stale:
        (hf_dir / name).unlink(missing_ok=True)
    return wrapped


def check_export_folder(hf_dir: Path) -> None:
    """``hf_dir`` may be new, or hold an earlier export (replaced), but not a training run or another program's
    ``config.json``: the export would write over them."""
    if hf_dir.exists() and not hf_dir.is_dir():
        raise ValueError(f"{hf_dir} is a file: give a folder to write the HF model into")
    if (hf_dir / "checkpoints").is_dir():
        raise ValueError(f"{hf_dir} holds a training run (checkpoints/): export into another folder")
    if (hf_dir / "config.json").is_file() and not is_export(hf_dir):
        raise ValueError(f"{hf_dir / 'config.json'} is not an exported miras model's (a run's, or another "
                         "program's): export into another folder")


def is_export(folder: Path) -> bool:
    """Whether ``folder/config.json`` is an exported miras model's (``model_type`` "miras"); False when it is
    missing or unreadable."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # (UnicodeDecodeError is a ValueError)
        return False
    return isinstance(config, dict) and config.get("model_type") == "miras"


def export_run(run_dir: str | os.PathLike, hf_dir: str | os.PathLike) -> MirasForCausalLM:
    """Convert the training run in ``run_dir`` (model, tokenizer, training config) to an HF folder."""
    try:
        from ..train import load_run
    except ImportError as error:
        raise ImportError(f"export_run needs miras.train.load_run, which this miras does not have ({error})") from None
    model, train_config, tokenizer = load_run(run_dir)
    return export(model, tokenizer, hf_dir, train_config=train_config)


def _portable_tokenizer_class(hf_dir: Path) -> None:
    """Transformers 5 names its fast tokenizer class "TokenizersBackend", which 4.x cannot load; the
    4.x name "PreTrainedTokenizerFast" loads in both (5.x keeps it as an alias)."""
    path = hf_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _plain(config):
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return config
