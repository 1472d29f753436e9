"""Llama/Mistral-family decoder (NNX), Hugging Face import/export, LoRA, generation and tokenizers."""

from selmerge_jax.models.config import PRESETS, ModelConfig, preset
from selmerge_jax.models.hf_import import config_from_hf, config_to_hf, load_hf, save_hf
from selmerge_jax.models.llama import Llama, count_params

__all__ = ["PRESETS", "Llama", "ModelConfig", "config_from_hf", "config_to_hf", "count_params", "load_hf",
           "preset", "save_hf"]
