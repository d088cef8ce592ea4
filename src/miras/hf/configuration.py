"""``MirasConfig``: a transformers config that carries the native :class:`~miras.models.ModelConfig`.

The native config is stored whole, as the dict field ``miras`` of ``config.json``, so the native
config stays the one source of truth (validated by ``ModelConfig.from_dict`` on every load) and
nothing is written twice. The few names other tools look for (``vocab_size``, ``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``) are read-only views of it.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ..models import ModelConfig

# The usual transformers names and the native ModelConfig fields they show.
_VIEWS = {"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "layers",
          "num_attention_heads": "heads"}


def _view_property(name: str) -> property:
    """``config.<name>``: the native field it shows (None on the empty default config). Setting it to
    another value is an error: ``from_pretrained(path, num_hidden_layers=2)`` would describe a model
    the weights are not for."""
    field = _VIEWS[name]

    def get(config: MirasConfig) -> int | None:
        return None if config.miras is None else config.miras[field]

    def set_(config: MirasConfig, value) -> None:
        if value != get(config):
            raise ValueError(f"{name}={value!r}: {name} is a read-only view of the native config's {field!r} "
                             f"(here {get(config)!r}); a MirasConfig cannot change the model's shape. Build "
                             f"a new one with MirasConfig.from_native(create(preset, {field}=...).config)")

    return property(get, set_)


class MirasConfig(PretrainedConfig):
    """``MirasConfig(miras=ModelConfig(...).to_dict())``; ``MirasConfig.from_native(config)`` does the same."""

    # save_pretrained copies this module's file beside the weights (trust_remote_code): point it at the
    # shim that imports from the installed package, see modeling_miras.py.
    __module__ = "miras.hf.modeling_miras"
    model_type = "miras"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, miras: dict | None = None, **kwargs):
        # transformers builds a default config (no arguments) to find which values differ from it.
        native = None if miras is None else ModelConfig.from_dict(dict(miras))
        self.miras = None if native is None else native.to_dict()
        tie = True if native is None else native.tie_embeddings
        if kwargs.setdefault("tie_word_embeddings", tie) != tie:
            raise ValueError(f"tie_word_embeddings={kwargs['tie_word_embeddings']} contradicts the native "
                             f"config's tie_embeddings={tie}")
        super().__init__(**kwargs)

    @classmethod
    def from_native(cls, config: ModelConfig, **kwargs) -> MirasConfig:
        return cls(miras=config.to_dict(), **kwargs)

    @property
    def model_config(self) -> ModelConfig:
        """The native config (a fresh frozen value each call)."""
        if self.miras is None:
            raise ValueError("this MirasConfig holds no model: build it as MirasConfig.from_native(model_config)")
        return ModelConfig.from_dict(dict(self.miras))

    # Views for tools that look for the usual names; None on the empty default config. They cannot be
    # set to another value (``from_pretrained(path, num_hidden_layers=2)`` would describe a model the
    # weights are not for): change the native config instead.
    vocab_size = _view_property("vocab_size")
    hidden_size = _view_property("hidden_size")
    num_hidden_layers = _view_property("num_hidden_layers")
    num_attention_heads = _view_property("num_attention_heads")
