"""Tier 3 of miras: language models built from the token mixers."""

from .config import FAMILIES, PRESETS, SIZES, ModelConfig, preset_config
from .lm import Block, LanguageModel, SwiGLU, check_buildable, create, sample
from .state import ModelState

__all__ = ["FAMILIES", "PRESETS", "SIZES", "ModelConfig", "preset_config", "Block", "LanguageModel", "SwiGLU",
           "check_buildable", "create", "sample", "ModelState"]
