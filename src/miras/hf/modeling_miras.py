"""The module ``save_pretrained`` copies beside the weights, for ``trust_remote_code=True`` loading.

Transformers saves the file of a custom class's module next to ``config.json`` and names it in
``auto_map``; loading imports that copy. The miras classes name this module as theirs, so the copy
is this file, which only imports from the installed package: a saved folder never carries a stale
copy of the model code, and loading it gives the very classes of ``miras.hf``. It needs
``pip install miras-lm[hf]`` wherever the folder is loaded.
"""

from miras.hf.configuration import MirasConfig
from miras.hf.modeling import MirasCache, MirasForCausalLM

__all__ = ["MirasCache", "MirasConfig", "MirasForCausalLM"]
