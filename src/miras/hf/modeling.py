"""``MirasForCausalLM``: any native miras language model behind the transformers API.

The wrapper owns the native :class:`~miras.models.LanguageModel`'s submodules directly (``embed``,
``blocks``, ``norm``, ``head``), so its state-dict keys are the native ones: a native
``model.state_dict()`` loads as is, and ``from_native`` shares the weights, not a copy. The forward
pass is the native one, ``model(ids, state) -> (logits, state)``.

Generation carries the recurrent :class:`~miras.models.ModelState` as the cache (``MirasCache``):
the prompt is prefilled in one native forward (the chunked fast path), then every step feeds only
the tokens the state has not seen (``state.seen`` counts them, so no ``cache_position`` is needed;
positions for attention come from the state too). Beam search gathers the states of the surviving
beams with :func:`~miras.hf.state.select_state`. Transformers renamed the cache argument and output
field from ``past_key_values`` (4.x) to ``cache`` (5.x): both names are accepted, the installed
release's name is used, and a generate step that arrives without the state it was handed raises
instead of decoding from scratch. Padding is not supported (a recurrent state would absorb the pad
tokens): an attention mask with zeros is an error. A cache that beam search has reordered holds the
running beams, not the returned sequences: continuing from it is an error. ``from_pretrained`` refuses a
folder that lacks a weight or holds one of another shape (transformers would leave it uninitialised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models import LanguageModel, ModelState
from .configuration import MirasConfig
from .state import select_state, state_batch

# Transformers 5.x calls the cache `cache` (argument and output field); 4.x `past_key_values`.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# 5.x maps tied parameters target -> source; 4.x lists the targets.
TIED_WEIGHTS = ({"head.weight": "embed.weight"} if hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")
                else ["head.weight"])


class MirasCache:
    """A :class:`ModelState` as a generation cache. A forward given a cache advances it in place
    (as transformers' own caches do) and returns it."""

    # What transformers' generation loop asks of a cache object.
    is_compileable = False
    is_linear = (True,)  # a recurrent state: generate must not slice the inputs by a KV length

    def __init__(self, state: ModelState, *, from_beam_search: bool = False):
        if not isinstance(state, ModelState):
            raise TypeError(f"MirasCache holds a miras ModelState, got {type(state).__name__}")
        self.state = state
        # Set once beam search has reordered it: its rows are then the running beams, not the sequences
        # generate returns (those are sorted by score), so it cannot continue them.
        self.from_beam_search = from_beam_search

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.seen

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.state = select_state(self.state, beam_idx)
        self.from_beam_search = True

    def batch_select_indices(self, indices: Tensor) -> None:
        self.state = select_state(self.state, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(state_batch(self.state)).repeat_interleave(repeats)
        self.state = select_state(self.state, index)

    def __repr__(self) -> str:
        return f"MirasCache(seen={self.state.seen}, batch={state_batch(self.state)})"


@dataclass
class _Generation:
    """Bookkeeping of one ``generate`` call: how many steps have been prepared."""

    steps: int = 0
    beam_search: bool = False  # a cache was reordered (beam search)


class MirasForCausalLM(PreTrainedModel, GenerationMixin):
    """``MirasForCausalLM(config)`` builds a fresh native model; ``from_native(model)`` wraps one."""

    __module__ = "miras.hf.modeling_miras"  # see MirasConfig: the file saved for trust_remote_code
    config_class = MirasConfig
    base_model_prefix = "miras"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _tied_weights_keys = TIED_WEIGHTS
    # A stateful model: transformers then neither builds a KV cache for it nor tries assisted decoding.
    _is_stateful = True

    def __init__(self, config: MirasConfig, native: LanguageModel | None = None):
        super().__init__(config)
        if config.tie_word_embeddings != config.model_config.tie_embeddings:  # e.g. a from_pretrained override
            raise ValueError(f"tie_word_embeddings={config.tie_word_embeddings} contradicts the native config's "
                             f"tie_embeddings={config.model_config.tie_embeddings}")
        if native is None:
            native = LanguageModel(config.model_config)
        elif native.config != config.model_config:
            raise ValueError(f"the native model's config {native.config} differs from {config.model_config}")
        # The native model's children become ours (same objects, same names): identical state-dict keys
        # and shared weights. The native model itself is kept outside the module tree, for its forward.
        for name, child in native.named_children():
            self.add_module(name, child)
        self.__dict__["native"] = native
        self._generation: _Generation | None = None
        self.post_init()

    @classmethod
    def from_native(cls, model: LanguageModel, **config_kwargs) -> MirasForCausalLM:
        """Wrap ``model``, sharing its parameters (a change to one is a change to the other)."""
        return cls(MirasConfig.from_native(model.config, **config_kwargs), native=model)

    def to_native(self) -> LanguageModel:
        """The native model this wraps (same parameters)."""
        return self.native

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own recurrent state, made by its forward

    def _init_weights(self, module: nn.Module) -> None:
        """No-op: the native constructors initialise every parameter (miras.models, miras.layers)."""

    def train(self, mode: bool = True) -> MirasForCausalLM:
        super().train(mode)
        self.native.training = mode
        return self

    def resize_token_embeddings(self, *args, **kwargs):
        """Refused before anything changes: a miras model's vocabulary is part of its native config (its
        ``vocab_size`` checks every id); create the model with the size wanted instead."""
        raise NotImplementedError("a miras model's vocabulary is fixed when it is created: create it with the "
                                  "size wanted (create(preset, vocab_size=N), or model.vocab_size=N in miras "
                                  "train) instead of resizing the embeddings")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = self.native.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.head = self.native.head = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None, labels: Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, past_key_values=None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None):
        """Logits [B, T, V] for ``input_ids`` [B, T] continuing ``cache`` (a MirasCache or ModelState,
        under either name); ``labels`` (shifted inside, -100 ignored) give the mean next-token loss."""
        if output_attentions or output_hidden_states:
            raise ValueError("miras models do not return attentions or hidden states")
        _check_no_padding(attention_mask)
        cache = _as_cache(_one_cache(cache, past_key_values))
        logits, state = self.native(input_ids, None if cache is None else cache.state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if use_cache is False:
            cache = None
        elif cache is None:
            cache = MirasCache(state)
        else:
            cache.state = state
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache})
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache=None, past_key_values=None,
                                      attention_mask: Tensor | None = None, use_cache: bool | None = True,
                                      inputs_embeds: Tensor | None = None, **kwargs) -> dict:
        """Only the tokens the state has not seen; the whole sequence when there is no state."""
        if inputs_embeds is not None:
            raise ValueError("miras models generate from input_ids, not inputs_embeds")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("miras models do not return attentions or hidden states")
        cache = _as_cache(_one_cache(cache, past_key_values))
        if self._generation is not None:
            if cache is None and use_cache is not False and self._generation.steps > 0:
                raise RuntimeError(
                    "transformers did not hand the recurrent state back to the model after the first step "
                    f"(looked for {CACHE_NAME!r}): this transformers release passes the cache differently. "
                    "Refusing to decode without it; generate(..., use_cache=False) re-reads the whole sequence.")
            self._generation.steps += 1
        if cache is not None:
            seen = cache.state.seen
            if input_ids.shape[1] <= seen:
                raise ValueError(f"input_ids has {input_ids.shape[1]} tokens but the cache has seen {seen}: pass the "
                                 "whole sequence (the tokens the cache has seen, then the new ones)")
            input_ids = input_ids[:, seen:]
            batch = state_batch(cache.state)
            if input_ids.shape[0] != batch:  # generate expanded the prompt (num_return_sequences, beams)
                if input_ids.shape[0] % batch:
                    raise ValueError(f"{input_ids.shape[0]} sequences do not continue a cache of {batch}")
                cache.batch_repeat_interleave(input_ids.shape[0] // batch)
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def _reorder_cache(self, cache, beam_idx: Tensor) -> MirasCache:
        """The states of the beams that survive a beam-search step, in their new order."""
        cache = _as_cache(cache)
        if self._generation is not None:
            self._generation.beam_search = True
        return MirasCache(select_state(cache.state, beam_idx), from_beam_search=True)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> MirasForCausalLM:
        """transformers' ``from_pretrained``, with every weight in memory of its own (see ``_own_memory``).
        A folder that lacks a weight or holds one of another shape is an error: transformers would leave
        it as uninitialised memory (``_init_weights`` is a no-op) and only report it. So is one with weights
        its config has no place for (a config of a smaller model): transformers would drop them."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", ()))
        mismatched = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get("mismatched_keys", ()))
        # a tied head is saved once (as embed.weight): a head.weight beside it has a place either way
        unexpected = sorted(key for key in info.get("unexpected_keys", ())
                            if not (key == "head.weight" and model.config.model_config.tie_embeddings))
        if missing or mismatched or unexpected:
            parts = ([f"lacks {missing}"] if missing else []) + ([f"has other shapes for {mismatched}"]
                                                                if mismatched else []) + (
                [f"holds weights its config has no place for, {unexpected}"] if unexpected else [])
            raise ValueError(f"the checkpoint {' and '.join(parts)}: a miras export holds every weight of its "
                             "model; re-export it (miras export) rather than load it partly initialised")
        _own_memory(model)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained`` (safetensors; a tied head is saved once, as ``embed.weight``),
        with ``auto_map`` naming ``modeling_miras.py`` for AutoModel too."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        self.config.auto_map = {**auto_map, "AutoModel": f"modeling_miras.{type(self).__name__}"}
        super().save_pretrained(save_directory, *args, **kwargs)

    def generate(self, inputs: Tensor | None = None, **kwargs):
        """transformers' ``generate`` (greedy, sampling, beam search) with the recurrent state as the cache.
        ``cache=`` (or ``past_key_values=``) continues a MirasCache/ModelState: then ``inputs`` must hold
        the tokens it has seen followed by the new ones."""
        cache = _as_cache(_one_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None)))
        if cache is not None:
            if cache.from_beam_search:
                raise ValueError("this cache comes from a beam search: it holds the running beams' states, not "
                                 "those of the sequences generate returned; continue without the cache (it re-reads "
                                 "the sequence)")
            kwargs[CACHE_NAME] = cache
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(prompt, Tensor) and prompt.ndim == 2 and prompt.shape[1] == 0:
            raise ValueError("the prompt is empty: generate continues at least one token (e.g. the tokenizer's "
                             "bos or eos id)")
        self._generation = generation = _Generation()
        try:
            return super().generate(inputs, **kwargs)
        finally:
            self._generation = None
            if generation.beam_search and cache is not None:  # expanded and reordered in place: the beams now
                cache.from_beam_search = True


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy weights that are views into a memory-mapped safetensors file into memory of their own.

    Transformers can leave CPU weights in the mapped file, at offsets with no 64-byte alignment; the
    CPU matmul kernels then take another path and round differently in the last bit, so the loaded
    model would not compute exactly what the saved one did. A copy is aligned (and outlives the file).
    Tied weights are one parameter, copied once, so they stay tied.
    """
    for parameter in model.parameters():
        if parameter.device.type == "cpu" and parameter.data_ptr() % 64:
            parameter.data = parameter.data.clone()


def _one_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the state as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _as_cache(value) -> MirasCache | None:
    if value is None or isinstance(value, MirasCache):
        return value
    if isinstance(value, ModelState):
        return MirasCache(value)
    # An empty transformers cache (made by a caller that did not ask the model) holds nothing to lose.
    if hasattr(value, "get_seq_length") and value.get_seq_length() == 0:
        return None
    raise TypeError(f"a miras model's cache is a MirasCache or ModelState, got {type(value).__name__}")


class PaddingError(ValueError):
    """A batch with padding (an attention mask holding zeros): the recurrent state would absorb the pad tokens."""


def _check_no_padding(attention_mask: Tensor | None) -> None:
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise PaddingError("miras models do not support padding (the recurrent state would absorb the pad tokens): "
                         "generate one sequence at a time, or batch sequences of equal length")
