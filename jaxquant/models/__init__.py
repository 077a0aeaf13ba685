"""Llama-family models in Flax NNX, Hugging Face loading/saving, and generation.

transformers provides configurations and tokenizers only; the model code is jaxquant's.
"""

from jaxquant.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, config_from_hf, load_config
from jaxquant.models.generate import generate, sample_token
from jaxquant.models.llama import KVCache, LlamaForCausalLM, functional
from jaxquant.models.loading import (
    NAME_TABLE,
    from_pretrained,
    hf_to_nnx_name,
    nnx_to_hf_name,
    read_checkpoint_tensors,
    read_safetensors,
    save_pretrained,
    write_safetensors,
)

__all__ = [
    "NAME_TABLE",
    "SUPPORTED_ARCHITECTURES",
    "KVCache",
    "LlamaForCausalLM",
    "ModelConfig",
    "config_from_hf",
    "from_pretrained",
    "functional",
    "generate",
    "hf_to_nnx_name",
    "load_config",
    "nnx_to_hf_name",
    "read_checkpoint_tensors",
    "read_safetensors",
    "sample_token",
    "save_pretrained",
    "write_safetensors",
]
