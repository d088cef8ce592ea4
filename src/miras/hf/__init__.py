"""HuggingFace integration (optional extra ``miras-lm[hf]``): the only part of miras that imports
``transformers``.

>>> from miras.hf import MirasForCausalLM, export
>>> model = MirasForCausalLM.from_native(native_model)     # shares the weights
>>> model.generate(ids, max_new_tokens=20, num_beams=2)    # the recurrent state is the cache
>>> export(native_model, tokenizer, "out")                 # safetensors, config, tokenizer, modeling_miras.py
>>> AutoModelForCausalLM.from_pretrained("out", trust_remote_code=True)
>>> run_lm_eval("out", ["lambada_openai"], limit=100)      # lm-evaluation-harness (pip install lm-eval)
"""

try:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
except ModuleNotFoundError as error:
    if error.name != "transformers":
        raise
    raise ModuleNotFoundError("miras.hf needs Hugging Face transformers: pip install 'miras-lm[hf]' (or "
                              "pip install transformers)", name="transformers") from None

from . import modeling_miras  # noqa: F401  (the module the classes name as theirs; save_pretrained copies it)
from .configuration import MirasConfig
from .export import export, export_run
from .harness import check_lm_eval_tasks, run_lm_eval
from .modeling import MirasCache, MirasForCausalLM, PaddingError
from .state import select_state
from .tokenization import bpe_tokenizer, byte_tokenizer, hf_tokenizer

AutoConfig.register(MirasConfig.model_type, MirasConfig, exist_ok=True)
AutoModel.register(MirasConfig, MirasForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(MirasConfig, MirasForCausalLM, exist_ok=True)
# save_pretrained then writes auto_map entries naming modeling_miras.py, so that a fresh process
# loads the folder with trust_remote_code=True without importing miras first.
MirasConfig.register_for_auto_class()
MirasForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MirasCache", "MirasConfig", "MirasForCausalLM", "PaddingError", "bpe_tokenizer", "byte_tokenizer",
           "check_lm_eval_tasks", "export", "export_run", "hf_tokenizer", "run_lm_eval", "select_state"]
